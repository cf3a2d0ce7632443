from jslora.cli import main

main()
