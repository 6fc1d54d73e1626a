"""The predictor behind ``predict`` (:mod:`.predictor`) and saliency maps (:mod:`.saliency`)."""
