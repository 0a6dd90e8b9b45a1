"""The core: the adapter's configuration (`config`), the prompt (`prompt`, `init`), the
model that routes rows to prompts (`model`, `layout`, `tasks`, `heads`, `losses`), each
prompt's KV computed once (`prefix`), generation through the prompts (`generation`),
PEFT-format files (`adapter_files`), what softprompt needs to know about a transformers
model (`introspect`, `attention`, `bf16`, `sharded_tensors`) and what a prompt learned
(`interpret`). It imports nothing from the layers above it (data, scoring, training,
sharding, serving, the command line): see `docs/design.md`."""
