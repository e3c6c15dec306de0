from claas.cli import main

main()
