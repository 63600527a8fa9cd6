import os

# Quiet TensorFlow's C++ logs before any test imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
