from petah.cli import main

main()
