"""The one owner of the crop-store format: :mod:`.format` (names, columns, identity), :mod:`.writer`
(Algorithm 1 over cases → store) and :mod:`.reader` (:class:`~.reader.CropStore`)."""
