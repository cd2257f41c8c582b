from imagebridge.cli import main

main()
