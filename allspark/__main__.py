from allspark.cli import main, run_cli

run_cli(main)
