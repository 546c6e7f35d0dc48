"""Tests of resnet_jax.report: the paper's Table 6 and Figure 6 from run logs, as errors."""

import json

from resnet_jax import report


def test_report_reads_curves_as_errors(tmp_path):
    run = tmp_path / 'sweep' / 'plain56'
    run.mkdir(parents=True)
    lines = [
        {'step': 50, 'train/loss': 2.0, 'train/top1_acc': 0.25},
        {'step': 100, 'train/loss': 1.5, 'train/top1_acc': 0.5},
        {'step': 100, 'eval/top1_acc': 0.4, 'eval/loss': 1.6},
        {'step': 100, 'test/top1_acc': 0.375, 'test/loss': 1.7},
    ]
    (run / 'metrics.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines))
    (log,) = report.find_runs(str(tmp_path / 'sweep'))
    assert (log.model, log.plain, log.depth, log.iterations) == ('plain56', True, 56, 100)
    assert log.train == [(50, 75.0), (100, 50.0)]
    assert log.test == [(100, 60.0)]
    assert log.final_test == 62.5
    assert '| plain56 | — | 100 | 50.00 | 62.50 | — |' in report.markdown_table([log])
    assert '*' not in report.markdown_table([log])

    # Unfinished (no test-split pass yet): the eval split's last value, marked as such.
    (run / 'metrics.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines[:3]))
    (log,) = report.find_runs(str(tmp_path / 'sweep'))
    table = report.markdown_table([log])
    assert '| plain56 | — | 100 | 50.00 | 60.00 * | — |' in table
    assert '\\* no test-split result yet: the last error on the eval split.' in table
