-module(thermo_app).
-behaviour(application).
-vsn("@VSN@").

-export([start/2, stop/1]).

start(_Type, _Args) ->
    thermo_sup:start_link().

stop(_State) ->
    ok.
