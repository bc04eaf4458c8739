"""ComfyUI nodes of the pack: thin adapters around hypernet/, one node class per file, each reaching ComfyUI only
through nodes/adapter/. The pack's own __init__.py registers them; this package imports nothing, so importing a
node file runs only that file and the adapter."""
