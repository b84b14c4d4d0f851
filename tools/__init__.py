"""Tools on top of the plugin: running TorchServe, archiving models, the quality report, soak."""
