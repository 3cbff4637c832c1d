from deltatune.cli import main

main()
