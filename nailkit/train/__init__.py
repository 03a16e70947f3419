"""Training the demo nail model with rfdetr's own trainer (demo) and on a lent GPU machine (gpu)."""
