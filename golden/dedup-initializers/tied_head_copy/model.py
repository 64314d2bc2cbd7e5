from golden._tied_head import exported_by_legacy as build  # noqa: F401
