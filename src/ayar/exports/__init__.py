"""`ayar export`: a run as a deployable artifact (merged safetensors), verified by the release gate."""
