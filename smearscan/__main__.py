from smearscan.cli import main

main()
