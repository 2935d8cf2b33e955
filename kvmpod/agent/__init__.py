"""The host side of the guest agent: protocol definition, frame codec and the asyncio session."""
