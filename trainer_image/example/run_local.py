"""Run the trainer exactly as the pod does, against a local S3 server, on the tiny model.

    python trainer_image/example/run_local.py            # start S3, seed it, train, check the adapter, stop
    python trainer_image/example/run_local.py --serve    # start S3 and seed it, then wait (Ctrl-C stops)

It starts versitygw on 127.0.0.1:9000 (see e2e/cluster/s3.py), uploads the tiny model to s3://models/tiny/ and
a small chat dataset to s3://datasets/chat/, writes the example config with that endpoint, runs
``python -m kubetune_trainer`` with KUBETUNE_CONFIG pointing at it, and loads the uploaded adapter with PEFT.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT / "trainer_image"), str(ROOT)]

from e2e.cluster.s3 import S3Server, upload_directory  # noqa: E402

from kubetune_devtools.tiny import save_tiny_model  # noqa: E402
from kubetune_trainer.contract import TrainerConfig  # noqa: E402


def chat_dataset(count: int, seed: int) -> bytes:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {a} + {b}?"},
                        {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
                    ]
                }
            )
        )
    return ("\n".join(lines) + "\n").encode()


def seed(server: S3Server, work: Path) -> None:
    client = server.client()
    for bucket in ("models", "datasets", "adapters"):
        client.create_bucket(Bucket=bucket)
    upload_directory(client, save_tiny_model(work / "tiny"), "models", "tiny/")
    client.put_object(Bucket="datasets", Key="chat/train.jsonl", Body=chat_dataset(200, seed=1))
    client.put_object(Bucket="datasets", Key="chat/val.jsonl", Body=chat_dataset(20, seed=2))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", action="store_true", help="seed the server and keep it running")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubetune-example-"))
    with S3Server(port=args.port) as server:
        seed(server, work)
        config = json.loads((HERE / "config.json").read_text())
        config["s3"]["endpoint"] = server.endpoint
        config_path = work / "config.json"
        config_path.write_text(json.dumps(config, indent=2))
        env = {
            **os.environ,
            **server.env(),
            "KUBETUNE_CONFIG": str(config_path),
            "KUBETUNE_WORK_DIR": str(work / "scratch"),
            "KUBETUNE_TERMINATION_LOG": str(work / "termination-log"),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "trainer_image"), str(ROOT)]),
        }
        if args.serve:
            print(f"S3 at {server.endpoint}; in another shell:")
            for key in (
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "KUBETUNE_CONFIG",
                "KUBETUNE_WORK_DIR",
                "KUBETUNE_TERMINATION_LOG",
                "PYTHONPATH",
            ):
                print(f"  export {key}={env[key]}")
            print("  python -m kubetune_trainer")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                return 0
        code = subprocess.call([sys.executable, "-m", "kubetune_trainer"], env=env)
        print("termination message:", (work / "termination-log").read_text())
        if code != 0:
            return code
        adapter = work / "adapter"
        client = server.client()
        output = TrainerConfig.from_json(config_path.read_text()).output.uri
        bucket, _, prefix = output[len("s3://") :].partition("/")
        for item in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
            (adapter / item["Key"][len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(adapter / item["Key"][len(prefix) :]))
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(work / "tiny")
        model = PeftModel.from_pretrained(base, adapter)
        print(
            f"PEFT loaded the adapter from {output}: {type(model).__name__}, "
            f"{sum(p.numel() for n, p in model.named_parameters() if 'lora_' in n)} LoRA parameters"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
