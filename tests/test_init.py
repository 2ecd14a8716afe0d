import sqjax


def test_public_api_imports_and_is_listed():
    for name in sqjax.__all__:
        assert getattr(sqjax, name) is not None, name
    assert sorted(sqjax.__all__) == sorted(set(sqjax.__all__))
