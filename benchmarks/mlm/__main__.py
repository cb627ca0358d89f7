from benchmarks.mlm.run import main

main()
