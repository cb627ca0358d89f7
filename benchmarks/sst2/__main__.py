from benchmarks.sst2.run import main

main()
