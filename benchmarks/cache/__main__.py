from benchmarks.cache.run import main

main()
