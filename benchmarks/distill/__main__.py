from benchmarks.distill.run import main

main()
