"""``python -m crc_lightning.pretrain``: see :mod:`crc_lightning.apps.pretrain`."""

from crc_lightning.apps.pretrain import main

if __name__ == "__main__":
    main()
