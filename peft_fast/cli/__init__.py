"""Layer L5: the `peft-fast` command line (bench | train | env | merge)."""
