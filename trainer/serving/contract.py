"""What an export promises its clients, defined once for the writer (trainer.export) and the readers
(trainer.serving, tests): signature and tensor names, and the files beside the SavedModel.

Signatures (both batched, both return the same outputs):
  serving_default(image_bytes: string [N])  and  predict_filenames(filenames: string [N])
  -> probability float32 [N], class_index int64 [N], class_name string [N], probabilities float32 [N, K]
"""
SERVING_SIGNATURE = "serving_default"
FILENAMES_SIGNATURE = "predict_filenames"  # reads paths inside the graph: never offered to clients
INPUT_NAME = "image_bytes"
FILENAMES_INPUT_NAME = "filenames"
# The outputs every export has; a real export may add more, which are passed through.
REQUIRED_OUTPUTS = ("probability", "class_index", "class_name")

CLASS_NAMES_FILE = "class_names.txt"  # one name per line, in class_index order
DATASET_METADATA_FILE = "dataset_metadata.json"  # the training data's sidecar, verbatim (provenance)
TRAIN_CONFIG_FILE = "train_config.json"  # how the model was trained, and its metrics
