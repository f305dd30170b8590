from sluice.handover.split import bundle_pieces


def test_small_pieces_share_a_bundle_up_to_the_limit():
    sizes = {f"app{i:02d}|2026112409": 100 for i in range(25)}
    bundles = bundle_pieces(sizes, 1000)
    assert [len(b) for b in bundles] == [10, 10, 5]
    assert sorted(p for b in bundles for p in b) == sorted(sizes)


def test_a_large_piece_gets_its_own_bundle():
    sizes = {"a|h": 10, "b|h": 5000, "c|h": 10}
    assert bundle_pieces(sizes, 1000) == [["a|h"], ["b|h"], ["c|h"]]


def test_no_pieces_no_bundles():
    assert bundle_pieces({}, 1000) == []
