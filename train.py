#!/usr/bin/env python
"""Train AllSpark on one modality.

    accelerate launch train.py --modality hsi                       # demo data, default LLM
    accelerate launch train.py --modality hsi --data-root /data/PaviaU
    torchrun --nproc_per_node 2 train.py --modality hsi             # two CPU processes (gloo)
"""
from allspark.cli import run_cli, train_main

if __name__ == "__main__":
    run_cli(train_main)
