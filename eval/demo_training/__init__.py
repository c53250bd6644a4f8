"""Training of the bundled demo VLMs (research code, run from a checkout: ``python eval/train_demo.py``)."""
