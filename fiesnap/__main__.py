from fiesnap.cli import main

main()
