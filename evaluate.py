#!/usr/bin/env python
"""Evaluate a trained checkpoint with its modality's protocol; writes metrics.json and report.md.

    python evaluate.py --modality hsi --checkpoint runs/hsi
"""
from allspark.cli import evaluate_main, run_cli

if __name__ == "__main__":
    run_cli(evaluate_main)
