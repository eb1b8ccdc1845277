"""Server behaviour tests: a real ``fishchat-iot up`` process, real sockets, raw
protocol clients (tests/support); no SDK and no mocks."""
