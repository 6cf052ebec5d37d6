from allspark.cli import list_main, run_cli

run_cli(list_main)
