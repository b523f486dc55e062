"""One run, top to bottom: resolve the config (stages), build the model (runmodel), cut the
examples (splits), the one loop (train, checkpoint, precision, sampling, tracking), write the
run folder (runfolder, artifacts). Merging adapters (merge) is a run without training."""
