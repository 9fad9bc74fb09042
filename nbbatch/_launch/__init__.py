"""Starting workers (local processes, or joining torchrun) and watching them."""
