%% 1.5.0: healthy at first, failing from 2 s after its first health check
%% (a leak that shows only under a soak).
-module(thermo_health).
-vsn("@VSN@").

-export([check/0]).

-define(HEALTHY_MS, 2000).

-spec check() -> ok | {failing, binary()}.
check() ->
    Now = erlang:monotonic_time(millisecond),
    Since = case persistent_term:get({?MODULE, first_check}, undefined) of
        undefined ->
            persistent_term:put({?MODULE, first_check}, Now),
            Now;
        T ->
            T
    end,
    case Now - Since < ?HEALTHY_MS of
        true -> ok;
        false -> {failing, <<"1.5.0 runs out of connections 2 s after it starts">>}
    end.
