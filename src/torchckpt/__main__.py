from torchckpt.cli.main import run

run()
