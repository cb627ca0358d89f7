"""The commands, each one file that reads like the recipe it runs: finetune, cache, distill,
eval (evaluate), env, demo; and the report eval writes."""
