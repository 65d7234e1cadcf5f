"""The workshop kit: tools to show a run (curves as a picture) beside the training code."""
