"""Where users already are: Lightning (``integrations.lightning``); Hugging Face and accelerate
folders are read by ``torchckpt.load`` / ``load_into`` / ``resume`` directly (``read/formats/folders.py``)."""
