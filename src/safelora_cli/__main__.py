from safelora_cli.cli import main

main()
