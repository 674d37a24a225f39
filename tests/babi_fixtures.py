"""Small bAbI files in the official format (the release itself cannot be downloaded here)."""

QA1 = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Where is Daniel? \thallway\t4
1 Sandra journeyed to the kitchen.
2 Where is Sandra? \tkitchen\t1
"""
QA8 = """1 Mary took the football.
2 Mary picked up the apple.
3 What is Mary carrying? \tfootball,apple\t1 2
1 John got the milk.
2 What is John carrying? \tmilk\t1
"""
QA1_TEST = """1 John moved to the office.
2 Where is John? \toffice\t1
"""
QA8_TEST = """1 Daniel took the milk.
2 Daniel took the football.
3 What is Daniel carrying? \tmilk,football\t1 2
"""


def write_release(root, copies: int = 10, tasks=range(1, 21)):
    """A release folder ``root/tasks_1-20_v1-2`` whose en-10k subset has, for every task in
    ``tasks``, ``copies`` times QA1's stories (QA8's for tasks 8 and 19, whose answers are lists
    and paths), and one test file each; plus an 'en' subset that must not be read."""
    folder = root / "tasks_1-20_v1-2" / "en-10k"
    folder.mkdir(parents=True)
    for task in tasks:
        train, test = (QA8, QA8_TEST) if task in (8, 19) else (QA1, QA1_TEST)
        (folder / f"qa{task}_task-{task}_train.txt").write_text(train * copies)
        (folder / f"qa{task}_task-{task}_test.txt").write_text(test)
    (root / "tasks_1-20_v1-2" / "en").mkdir()
    (root / "tasks_1-20_v1-2" / "en" / "qa1_single-supporting-fact_train.txt").write_text("1 Zebra here.\n")
    return root / "tasks_1-20_v1-2"
