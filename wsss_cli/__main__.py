from wsss_cli.main import main

main()
