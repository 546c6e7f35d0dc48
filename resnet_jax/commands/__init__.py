"""The commands: each one flags, one library call and its output; nothing in the library imports
them. `python -m resnet_jax COMMAND --flags` runs one (`python -m resnet_jax` lists them);
`train.py` at the repository root is the trainer's.

`cli` is what they share: absl flags, the run's recorded config, logging, stop signals, and the
one `error:` line every mistake ends as.
"""

COMMANDS = {
    'evaluate': 'metrics of a checkpoint on a split (also 10-crop, multi-scale); export it',
    'predict': 'the most likely classes of image files, from a run or a weights file',
    'sweep': 'train a grid of runs one after another; rerunning resumes it',
    'report': "the paper's Table 6 and Figure 6 from the logs of a sweep",
    'analysis': "the paper's Figure 7: the responses of every 3x3 layer",
    'tables': 'rewrite the tables the docs quote from the code',
    'parity': 'logit parity of converted weights against torchvision and Keras',
}
