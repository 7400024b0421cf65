"""kubetune operator: turns a FineTuneJob into a trainer Job and keeps the FineTuneJob's status true."""
