"""tools/dataset_converters/generate_shapes.py."""

import os.path as osp

from pycocotools.coco import COCO

from .conftest import load_tool


def test_cli_generates_skips_and_refuses(tmp_path, capsys):
    cli = load_tool('tools/dataset_converters/generate_shapes.py')
    out = str(tmp_path / 'shapes')
    args = ['--out', out, '--num-train', '6', '--num-val', '3', '--img-size', '64']
    args += ['--max-size', '40', '--seed', '5']
    assert cli.main(args) == 0
    assert 'train: generated' in capsys.readouterr().out
    assert len(COCO(osp.join(out, 'annotations', 'train.json')).getImgIds()) == 6
    assert len(COCO(osp.join(out, 'annotations', 'val.json')).getImgIds()) == 3
    assert cli.main(args) == 0
    assert 'already complete' in capsys.readouterr().out
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'mine.txt').write_text('x')
    assert cli.main(['--out', str(foreign), '--num-train', '2', '--num-val', '1']) == 2
    assert 'refusing' in capsys.readouterr().err
    assert cli.main(['--out', out, '--img-size', '8']) == 2
    assert 'img_size' in capsys.readouterr().err
