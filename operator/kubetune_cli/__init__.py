"""`kubectl finetune`: FineTuneJobs from the terminal (list, describe with a loss chart, logs, plot, wait,
suspend, resume, cancel).

It talks to the cluster only through the `kubectl` it is a plugin of, so every kubeconfig, context and
credential plugin that kubectl understands works unchanged, and it never needs S3 credentials: everything it
shows is in the FineTuneJob's status or the trainer pod's log. Standard library only, except `plot`
(matplotlib).
"""
