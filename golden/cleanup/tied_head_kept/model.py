from golden._tied_head import exported_by_dynamo as build  # noqa: F401
