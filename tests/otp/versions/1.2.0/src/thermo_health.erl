%% 1.2.0: installs fine, then reports itself unhealthy (HTTP 503).
-module(thermo_health).
-vsn("@VSN@").

-export([check/0]).

-spec check() -> ok | {failing, binary()}.
check() ->
    {failing, <<"1.2.0 ships a broken dependency check">>}.
