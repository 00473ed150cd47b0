from lightning_tools.cli import main

main()
