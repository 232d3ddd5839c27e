"""The learner's weights in and out: streamed into and gathered from sharded ranks, checkpoints, Hugging Face folders."""
