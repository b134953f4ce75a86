from vidiff.cli import main

main()
