from cbq.report.cli import main

main()
