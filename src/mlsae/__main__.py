from mlsae.cli import main

main()
