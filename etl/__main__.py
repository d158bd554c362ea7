from etl.pipeline import main

main()
